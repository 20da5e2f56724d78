//! The shape of the synthetic ICS: Places, PCNs, GP practices with their list sizes and
//! catchments, the two acute trusts, the social-care provider and the local authority.

use super::rng::{Rng, normal};
use serde::{Deserialize, Serialize};

/// The four Places of the synthetic ICS, as the `place` column and policies spell them.
pub const PLACES: [&str; 4] = ["North", "South", "East", "West"];

/// The town each Place is named after in organisation and PCN names.
const PLACE_TOWNS: [&str; 4] = ["Northbrook", "Southmere", "Eastwick", "Westholme"];

/// Postcode areas per Place. No UK postcode area starts with Q, so these can never be
/// mistaken for real addresses.
pub const POSTCODE_AREAS: [&str; 4] = ["QN", "QS", "QE", "QW"];

/// Share of each Place's residents in IMD quintiles 1 (most deprived) to 5. Eastwick is
/// an inner-urban Place, Southmere affluent and rural.
pub const PLACE_IMD: [[f64; 5]; 4] = [
    [0.25, 0.22, 0.20, 0.18, 0.15],
    [0.08, 0.14, 0.22, 0.26, 0.30],
    [0.38, 0.26, 0.16, 0.12, 0.08],
    [0.15, 0.20, 0.22, 0.22, 0.21],
];

/// Relative size of each Place's population.
const PLACE_WEIGHTS: [f64; 4] = [0.27, 0.22, 0.29, 0.22];

/// People per LSOA (ONS targets ~1,500; 1,600 is typical after growth).
const PEOPLE_PER_LSOA: usize = 1_600;

/// Practice-name stems; combined with [`PRACTICE_SUFFIXES`] for a few hundred unique names.
const PRACTICE_STEMS: [&str; 60] = [
    "Riverside",
    "Abbey",
    "Beacon",
    "Bridge Street",
    "Castle",
    "Cedar House",
    "Church Lane",
    "Elm Tree",
    "Fairfield",
    "Friarwood",
    "Hawthorn",
    "Highfield",
    "Kingsway",
    "Larkspur",
    "Market Square",
    "Meadowbank",
    "Millbrook",
    "Moor Lane",
    "Northgate",
    "Oakwood",
    "Orchard",
    "Parkside",
    "Priory",
    "Queens Road",
    "Rosehill",
    "St Mary's",
    "St John's",
    "Station Road",
    "The Grange",
    "Valley",
    "Victoria",
    "Westfield",
    "Willow",
    "Woodlands",
    "Yew Tree",
    "Ashfield",
    "Birchwood",
    "Brookside",
    "Canal Side",
    "Chapel Street",
    "Crown",
    "Dale View",
    "Eastfield",
    "Foxhill",
    "Greenacres",
    "Harbour",
    "Heathside",
    "Holly Bank",
    "Ivy Lodge",
    "Lime Tree",
    "Manor",
    "Mill Hill",
    "Newlands",
    "Old School",
    "Park View",
    "Redwood",
    "Springfield",
    "Thornbury",
    "Welland",
    "Wolds",
];

const PRACTICE_SUFFIXES: [&str; 5] = [
    "Medical Practice",
    "Surgery",
    "Health Centre",
    "Medical Centre",
    "Family Practice",
];

const PCN_STEMS: [&str; 6] = [
    "Central",
    "Rural",
    "Coastal",
    "Valley",
    "Riverside",
    "Heritage",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    GpPractice,
    AcuteTrust,
    SocialCare,
    LocalAuthority,
}

impl OrgKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::GpPractice => "gp_practice",
            OrgKind::AcuteTrust => "acute_trust",
            OrgKind::SocialCare => "social_care",
            OrgKind::LocalAuthority => "local_authority",
        }
    }

    /// The one dataset each kind of organisation serves.
    pub fn dataset(self) -> &'static str {
        match self {
            OrgKind::GpPractice => "gp_patients",
            OrgKind::AcuteTrust => "acute_admissions",
            OrgKind::SocialCare => "social_care_packages",
            OrgKind::LocalAuthority => "la_residents",
        }
    }
}

/// One partner organisation, as the manifest (`ics.json`) records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Org {
    pub ods_code: String,
    pub name: String,
    pub kind: OrgKind,
    pub place: Option<String>,
    pub pcn: Option<String>,
    pub dataset: String,
    /// GP list size (public); `None` for other organisations.
    pub registered_population: Option<u64>,
}

/// A GP practice and what drives its registered population.
#[derive(Debug, Clone)]
pub struct Practice {
    pub ods_code: String,
    pub name: String,
    pub place: usize,
    pub pcn: usize,
    pub list_size: usize,
    /// Probability of each IMD quintile among its patients.
    pub imd: [f64; 5],
    /// Positive: younger list (students, young families); negative: older.
    pub age_tilt: f64,
}

#[derive(Debug, Clone)]
pub struct Lsoa {
    pub code: String,
    pub place: usize,
    pub imd_quintile: u8,
    /// Postcode district number inside the Place's area.
    pub district: u32,
}

/// Everything about the ICS that is not a person.
#[derive(Debug, Clone)]
pub struct Ics {
    pub practices: Vec<Practice>,
    pub pcns: Vec<(String, usize)>,
    pub lsoas: Vec<Lsoa>,
    /// `lsoa_index[place][quintile-1]` = indices into `lsoas`.
    pub lsoa_index: Vec<Vec<Vec<usize>>>,
    pub trusts: [Org; 2],
    pub social_care: Org,
    pub local_authority: Org,
}

impl Ics {
    /// Which trust (0 or 1) serves a Place: North and East go to Riverside Hospitals,
    /// South and West to Wolds and Coast.
    pub fn home_trust(place: usize) -> usize {
        match place {
            0 | 2 => 0,
            _ => 1,
        }
    }

    pub fn practice_org(&self, p: &Practice) -> Org {
        Org {
            ods_code: p.ods_code.clone(),
            name: p.name.clone(),
            kind: OrgKind::GpPractice,
            place: Some(PLACES[p.place].to_string()),
            pcn: Some(self.pcns[p.pcn].0.clone()),
            dataset: OrgKind::GpPractice.dataset().to_string(),
            registered_population: Some(p.list_size as u64),
        }
    }
}

fn non_gp_org(ods: &str, name: &str, kind: OrgKind) -> Org {
    Org {
        ods_code: ods.to_string(),
        name: name.to_string(),
        kind,
        place: None,
        pcn: None,
        dataset: kind.dataset().to_string(),
        registered_population: None,
    }
}

/// How many practices a population of `n` supports: about one per 9,000 registered
/// patients (England's mean list size is ~10,000), never fewer than six.
pub fn practice_count(n: usize) -> usize {
    (n / 9_000).max(6)
}

/// Split `n` people into practices of realistic, varied list sizes.
fn list_sizes(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    // Log-normal around 8,500 with the spread of real English list sizes, clipped to
    // 2k-30k, then scaled so the total is exactly n.
    let raw: Vec<f64> = (0..k)
        .map(|_| (8_500.0 * (0.55 * normal(rng)).exp()).clamp(2_000.0, 30_000.0))
        .collect();
    let total: f64 = raw.iter().sum();
    let mut sizes: Vec<usize> = raw
        .iter()
        .map(|r| ((r / total) * n as f64).floor() as usize)
        .collect();
    let assigned: usize = sizes.iter().sum();
    // The rounding remainder goes to the largest practice.
    if let Some(largest) = (0..k).max_by_key(|&i| sizes[i]) {
        sizes[largest] += n - assigned;
    }
    sizes
}

fn pick5(rng: &mut Rng, w: &[f64; 5]) -> usize {
    super::rng::pick(rng, w)
}

/// Build the ICS for a population of `n` registered with `k` GP practices
/// ([`practice_count`] unless the caller chose).
pub fn build(rng: &mut Rng, n: usize, k: usize) -> Ics {
    let sizes = list_sizes(rng, n, k);

    // Practices to Places in proportion to PLACE_WEIGHTS (largest remainder).
    let mut per_place = [0usize; 4];
    for (i, slot) in per_place.iter_mut().enumerate() {
        *slot = (PLACE_WEIGHTS[i] * k as f64).floor() as usize;
    }
    let mut i = 0;
    while per_place.iter().sum::<usize>() < k {
        per_place[i % 4] += 1;
        i += 1;
    }
    for slot in per_place.iter_mut() {
        if *slot == 0 {
            *slot = 1;
        }
    }
    while per_place.iter().sum::<usize>() > k {
        if let Some(big) = (0..4).max_by_key(|&j| per_place[j]) {
            per_place[big] -= 1;
        }
    }

    // ~19 PCNs for a full-size ICS (one per 30-50k patients), at least one per Place.
    let pcn_total = (k as f64 / 5.5).round().clamp(4.0, 19.0) as usize;
    let mut pcns: Vec<(String, usize)> = Vec::new();
    let mut pcn_of_place: Vec<Vec<usize>> = vec![Vec::new(); 4];
    for place in 0..4 {
        let share = (pcn_total as f64 * per_place[place] as f64 / k as f64).round() as usize;
        let count = share.clamp(1, per_place[place].max(1));
        for j in 0..count {
            let name = if count == 1 {
                format!("{} PCN", PLACE_TOWNS[place])
            } else {
                format!(
                    "{} {} PCN",
                    PLACE_TOWNS[place],
                    PCN_STEMS[j % PCN_STEMS.len()]
                )
            };
            pcn_of_place[place].push(pcns.len());
            pcns.push((name, place));
        }
    }

    let mut by_place: Vec<Vec<Practice>> = vec![Vec::new(); 4];
    let mut idx = 0usize;
    for place in 0..4 {
        for j in 0..per_place[place] {
            let stem = PRACTICE_STEMS[idx % PRACTICE_STEMS.len()];
            let suffix = PRACTICE_SUFFIXES[(idx / PRACTICE_STEMS.len() + idx) % 5];
            let round = idx / (PRACTICE_STEMS.len() * PRACTICE_SUFFIXES.len());
            let name = if round == 0 {
                format!("{stem} {suffix}")
            } else {
                format!("{stem} {suffix} ({})", round + 1)
            };
            // Each practice's catchment centres on one quintile drawn from its Place's
            // profile: practices differ far more in deprivation than Places do.
            let centre = pick5(rng, &PLACE_IMD[place]);
            let mut imd = [0.0; 5];
            for (q, w) in imd.iter_mut().enumerate() {
                let dist = (q as f64 - centre as f64).abs();
                let local = match dist as u32 {
                    0 => 0.55,
                    1 => 0.18,
                    2 => 0.05,
                    _ => 0.02,
                };
                *w = 0.6 * local + 0.4 * PLACE_IMD[place][q];
            }
            let pcn_list = &pcn_of_place[place];
            let pcn = pcn_list[(j * pcn_list.len()) / per_place[place].max(1)];
            by_place[place].push(Practice {
                ods_code: format!("B8{}{:03}", place + 1, j + 1),
                name,
                place,
                pcn,
                list_size: sizes[idx],
                imd,
                age_tilt: (normal(rng) * 0.15).clamp(-0.35, 0.35),
            });
            idx += 1;
        }
    }

    // Interleave the Places (North 1, South 1, East 1, West 1, North 2, ...) so that "the
    // first K practices" (`--nodes-limit`) span the whole ICS.
    let mut practices = Vec::with_capacity(k);
    let longest = by_place.iter().map(Vec::len).max().unwrap_or(0);
    let mut queues: Vec<std::collections::VecDeque<Practice>> =
        by_place.into_iter().map(Into::into).collect();
    for _ in 0..longest {
        for q in queues.iter_mut() {
            if let Some(p) = q.pop_front() {
                practices.push(p);
            }
        }
    }

    // LSOAs per Place, quintiles in proportion to the Place's profile.
    let mut place_pop = [0usize; 4];
    for p in &practices {
        place_pop[p.place] += p.list_size;
    }
    let mut lsoas = Vec::new();
    let mut lsoa_index = vec![vec![Vec::new(); 5]; 4];
    for place in 0..4 {
        let count = place_pop[place].div_ceil(PEOPLE_PER_LSOA).max(5);
        for j in 0..count {
            let position = (j as f64 + 0.5) / count as f64;
            let mut q = 0;
            let mut cumulative = 0.0;
            for (qi, share) in PLACE_IMD[place].iter().enumerate() {
                cumulative += share;
                if position <= cumulative {
                    q = qi;
                    break;
                }
                q = qi;
            }
            lsoa_index[place][q].push(lsoas.len());
            lsoas.push(Lsoa {
                code: format!("E01{:06}", 90_000 + place * 10_000 + j),
                place,
                imd_quintile: q as u8 + 1,
                district: 1 + (j / 6) as u32,
            });
        }
    }

    Ics {
        practices,
        pcns,
        lsoas,
        lsoa_index,
        trusts: [
            non_gp_org(
                "RW1",
                "Riverside Hospitals NHS Foundation Trust",
                OrgKind::AcuteTrust,
            ),
            non_gp_org(
                "RW2",
                "Wolds and Coast University Hospitals NHS Trust",
                OrgKind::AcuteTrust,
            ),
        ],
        social_care: non_gp_org(
            "SCP01",
            "Riverside Community Care Partnership",
            OrgKind::SocialCare,
        ),
        local_authority: non_gp_org(
            "LA801",
            "Riverside Borough Council",
            OrgKind::LocalAuthority,
        ),
    }
}
